"""The registries' names that the commands' options offer, spelt out so that a command's --help
imports neither torch nor the registries (tests/test_cli_compare.py holds each list equal to
the registry it names)."""

DEFAULT_DATASET = "fashion-mnist"  # ddtool.data.DEFAULT_DATASET
PROTOCOL_NAMES = ("classic", "classic-dsa", "datm", "kd", "kd-tiny", "mtt")  # sorted(ddtool.evaluation.PROTOCOLS)
PRECISIONS = ("fp32", "bf16")  # ddtool.training.PRECISIONS
EXPORT_FORMATS = ("imagefolder", "npz", "torch")  # ddtool.storage.EXPORT_FORMATS
IMPORT_FORMATS = ("mtt", "dc", "npz", "torch")  # ddtool.storage.IMPORT_FORMATS
METHOD_NAMES = ("cda", "datm", "ftd", "herding", "kcenter", "mtt", "random", "sre2l", "tesla")  # list_methods()
DATASET_NAMES = ("fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "tiny-imagenet")  # list_specs()
NETWORK_NAMES = (  # list_networks(), aliases included
    "alexnet", "alexnet-bn", "convnet", "convnet-ap", "convnet-bn", "convnet-gn", "convnet-in", "convnet-ln",
    "convnet-mp", "convnet-nn", "convnet-np", "convnetd1", "convnetd2", "convnetd3", "convnetd4", "convnetd5",
    "convnetw256", "convnetw32", "convnetw64", "lenet", "mlp", "resnet18", "resnet18-ap", "resnet18-bn",
    "resnet18-bn-ap", "vgg11", "vgg11-bn",
)


def completes(names: tuple[str, ...]):
    """A click shell_complete offering `names` (the option still takes any value: the registry
    checks it, with its own message)."""
    def complete(ctx, param, incomplete: str) -> list[str]:
        return [name for name in names if name.startswith(incomplete)]

    return complete
