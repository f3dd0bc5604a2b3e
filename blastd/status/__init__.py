"""Status broadcasts: one status posted to an anchor contact, then resent to the rest in batches."""
