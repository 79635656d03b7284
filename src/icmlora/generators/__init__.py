"""Maps from a task vector to an adapter, one module per kind (``ridge``: a closed-form linear map)."""
