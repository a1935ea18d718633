"""Job types: one module per built-in family (backup, chain, migration), each holding
everything jobcore knows about its types; ``jobcore.types.base`` is the shape every type
module, built-in or third-party, fills in (design/README.md, "Adding a job type")."""

from jobcore.types.base import JobTypeInfo, XMLCodec

__all__ = ["JobTypeInfo", "XMLCodec"]
