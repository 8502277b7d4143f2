"""The name scripts written against speclabel 0.1 import: setups moved to :mod:`speclabel.core.setups`."""

from speclabel.core.setups import Arm, Setup, get_setup

__all__ = ["Arm", "Setup", "get_setup"]
