"""The registries' names that the commands' options offer, spelt out so that a command's --help
imports neither torch nor the registries (tests/test_cli_compare.py holds each list equal to
the registry it names)."""

DEFAULT_DATASET = "fashion-mnist"  # ddtool.data.DEFAULT_DATASET
PROTOCOL_NAMES = ("classic", "classic-dsa", "datm", "kd", "kd-tiny", "mtt")  # sorted(ddtool.evaluation.PROTOCOLS)
PRECISIONS = ("fp32", "bf16")  # ddtool.training.PRECISIONS
EXPORT_FORMATS = ("imagefolder", "npz", "torch")  # ddtool.storage.EXPORT_FORMATS
IMPORT_FORMATS = ("mtt", "dc", "npz", "torch")  # ddtool.storage.IMPORT_FORMATS
