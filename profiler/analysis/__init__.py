"""The analysis layer: findings, live rules, the comparison verdict and the gate, pure functions of records."""
