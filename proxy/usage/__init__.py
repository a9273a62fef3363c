"""What image requests cost and who spent it: the usage ledger, prices, budgets and the seeded-request cache."""
