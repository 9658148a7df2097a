"""painnet: personalized deep decoders of spontaneous pain from fMRI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("painnet")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

# Registers painnet's OmegaConf resolvers (used by painnet/conf, e.g. ${painnet.sim_suffix:...}).
from painnet import config_checks as _config_checks  # noqa: E402, F401
