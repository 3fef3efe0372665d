"""Rewrite passes (`QPass` subclasses), one module per family; `qpass.registry.PASSES` names them."""
