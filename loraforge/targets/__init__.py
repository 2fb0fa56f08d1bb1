"""The target kinds (the recipe's `kind:`), one class each, listed in registry.py (contract: plan/kinds.py)."""
