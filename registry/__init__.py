"""The datanet and adapter registry: datanets, versions, signed contributions, Merkle roots, adapters and lineage."""
