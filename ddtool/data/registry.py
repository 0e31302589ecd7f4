"""The datasets ddtool knows by name, and what the rest of the toolkit needs to know about them.

A `DatasetSpec` is fixed per dataset (shape, classes, the normalisation statistics the
literature uses), except for ImageFolder datasets (`folder:/path`), whose spec is computed from
their files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ddtool.errors import ConfigError

DEFAULT_DATASET = "fashion-mnist"
FOLDER_PREFIX = "folder:"


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # registry key, lower case; "folder:<path>" for ImageFolder datasets
    channels: int
    image_size: int  # square images: height == width
    num_classes: int
    # Class names, indexed by label. Empty in the registry entry of a dataset whose names only
    # its files know (tiny-imagenet); the spec of loaded data (RawDataset/PreparedData) has them.
    classes: tuple[str, ...]
    flip: bool  # False for digits (MNIST, SVHN): augmentation must not mirror them
    mean: tuple[float, ...]  # per-channel mean/std of the training pixels in [0, 1]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ConfigError(f"Dataset {self.name!r}: {self.channels} channels; ddtool handles 1 or 3.")
        if self.classes and len(self.classes) != self.num_classes:
            raise ConfigError(
                f"Dataset {self.name!r}: {len(self.classes)} class names for {self.num_classes} classes."
            )
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(f"Dataset {self.name!r}: mean/std need one value per channel.")
        if not all(s > 0 for s in self.std):
            raise ConfigError(f"Dataset {self.name!r}: every channel std must be positive.")


_DIGITS = tuple(str(d) for d in range(10))

_CIFAR100_CLASSES = tuple(
    """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
    butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch
    crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo
    keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse
    mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy
    porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper
    snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television
    tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()
)

_SPECS = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="fashion-mnist",
            channels=1,
            image_size=28,
            num_classes=10,
            classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
            flip=True,
            mean=(0.2861,),
            std=(0.3530,),
        ),
        DatasetSpec("mnist", 1, 28, 10, _DIGITS, flip=False, mean=(0.1307,), std=(0.3081,)),
        DatasetSpec(
            name="cifar10",
            channels=3,
            image_size=32,
            num_classes=10,
            classes=("airplane", "automobile", "bird", "cat", "deer",
                     "dog", "frog", "horse", "ship", "truck"),
            flip=True,
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2023, 0.1994, 0.2010),
        ),
        DatasetSpec(
            name="cifar100",
            channels=3,
            image_size=32,
            num_classes=100,
            classes=_CIFAR100_CLASSES,
            flip=True,
            mean=(0.5071, 0.4866, 0.4409),
            std=(0.2673, 0.2564, 0.2762),
        ),
        DatasetSpec(
            name="svhn",
            channels=3,
            image_size=32,
            num_classes=10,
            classes=_DIGITS,
            flip=False,
            mean=(0.4377, 0.4438, 0.4728),
            std=(0.1980, 0.2010, 0.1970),
        ),
        DatasetSpec(
            name="tiny-imagenet",
            channels=3,
            image_size=64,
            num_classes=200,
            classes=(),  # WordNet ids and names come from wnids.txt / words.txt
            flip=True,
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
        ),
    )
}

# Names are compared with case, '-', '_' and spaces ignored ("Fashion_MNIST" == "fashionmnist"),
# so only aliases that differ beyond that need listing.
_ALIASES = {
    "fmnist": "fashion-mnist",
    "tiny": "tiny-imagenet",
    "tinyimagenet200": "tiny-imagenet",
}


def _squash(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch not in "-_ ")


_LOOKUP = {_squash(key): key for key in _SPECS} | _ALIASES


def folder_root(name: str) -> Path | None:
    """The root of an ImageFolder dataset named `folder:/path`, or None for a registry name."""
    if not name.lower().startswith(FOLDER_PREFIX):
        return None
    path = name[len(FOLDER_PREFIX):].strip()
    if not path:
        raise ConfigError("An ImageFolder dataset is named folder:/path/to/root; the path is missing.")
    return Path(path).expanduser().absolute()


def canonical_name(name: str) -> str:
    """The registry key for a name or alias (case-insensitive); ConfigError if unknown."""
    root = folder_root(name)
    if root is not None:
        return FOLDER_PREFIX + str(root)
    key = _LOOKUP.get(_squash(name))
    if key is None:
        known = ", ".join(f"{n} (default)" if n == DEFAULT_DATASET else n for n in _SPECS)
        raise ConfigError(
            f"Unknown dataset {name!r}. Known datasets: {known}; or folder:/path/to/root for an "
            "ImageFolder dataset (train/ and test/ or val/ holding one subfolder per class)."
        )
    return key


def get_spec(name: str) -> DatasetSpec:
    """The spec of a dataset by name or alias.

    For `folder:/path` the spec is computed from the files, which decodes the images once
    (then cached, see ddtool.data.sources.load_raw).
    """
    key = canonical_name(name)
    if key in _SPECS:
        return _SPECS[key]
    # sources imports this module, so it is imported here, when a folder spec is asked for.
    from ddtool.data.sources import load_raw

    return load_raw(key).spec


def list_specs() -> list[DatasetSpec]:
    """The registry, default dataset first (ImageFolder datasets are not listed)."""
    return list(_SPECS.values())
