"""ddtool: dataset distillation for image classification.

Architecture, one concern per subpackage, in the order data flows:
data -> networks -> augment -> experts -> matching -> methods -> storage -> evaluation -> cli.
"""

__version__ = "0.1.0"
