"""What the driver raises for `dip` to report; kept free of heavy imports, since cluster/cli/main.py
imports it at registration time."""


class TrainingFailed(RuntimeError):
    """A run stopped for a reason its message explains, with what to do (e.g. training diverged after
    its allowed rollbacks): `dip` prints the message as one line and exits 1."""
