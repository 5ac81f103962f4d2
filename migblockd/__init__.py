"""migblockd: QEMU's migration blocker registry, served over QMP on a Unix socket."""

__version__ = "0.1.0"
