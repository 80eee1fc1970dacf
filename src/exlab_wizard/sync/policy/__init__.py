"""Pure decisions: they take the clock, the config and the facts, and return a decision."""
