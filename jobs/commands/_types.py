"""argparse value types shared by the subcommands, so bad values are usage errors (exit 2)."""

from __future__ import annotations

import argparse
import importlib


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive number, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction within [0, 1], got {text}")
    return value


def add_ray_address(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The one ``--address`` of every command that runs on Ray (``pipeline.ray_session``)."""
    parser.add_argument(
        "--address",
        help="Ray cluster to run on: auto, HOST:6379, ray://HOST:10001, or local for a fresh local "
        "instance (default: $RAY_ADDRESS, a `ray start` cluster on this machine, else a local Ray)",
    )


class CodeDefault:
    """A default that ``--help`` states, looked up in the code that uses it only when the help is
    printed: the dataclasses holding it import torch, too slow for every ``speclabel`` call.

    ``stated_default(action, "speclabel.model.training:TrainConfig.epochs")``, and ``%(code_default)s``
    in the action's help; a dataclass named by the path is instantiated for its default.
    """

    def __init__(self, path: str):
        self.path = path

    def value(self):
        module, _, attributes = self.path.partition(":")
        value = importlib.import_module(module)
        for name in attributes.split("."):
            value = getattr(value, name)
            if isinstance(value, type):
                value = value()
        return value

    def __str__(self) -> str:
        return str(self.value())


def stated_default(action: argparse.Action, path: str) -> argparse.Action:
    action.code_default = CodeDefault(path)
    return action


def add_lock_timeout(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The one ``--lock-timeout`` of every command that writes a dataset (``pipeline.lock``)."""
    from speclabel.pipeline.lock import DEFAULT_LOCK_TIMEOUT_S

    parser.add_argument(
        "--lock-timeout",
        type=positive_float,
        default=DEFAULT_LOCK_TIMEOUT_S,
        metavar="SECONDS",
        help=f"take over a lock that was not renewed for this long: its run died (default "
        f"{DEFAULT_LOCK_TIMEOUT_S:g}; a running job renews its lock every timeout/4, at most every 60 s)",
    )
