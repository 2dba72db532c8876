"""Model adapters: policies and reward models behind small protocols."""
