"""migblockd's QAPI schema generator, in the style of QEMU's ``scripts/qapi``.

``parser`` reads the schema language (``doccomment`` its doc comments),
``builder`` checks it and builds the model (``schema``, with
``names`` for QEMU's naming rules), and each back end derives one
artefact from the model: ``jsonschema`` (JSON Schemas), ``introspect`` (the
``query-qmp-schema`` answer) and ``doc`` (help text, rendered by ``doctext``).
``main`` is the ``migblockd-qapi-gen`` command.
"""

from .error import QAPIError, SourceInfo

__all__ = ["QAPIError", "SourceInfo"]
