"""Parts that families are built from (networks, adversarial heads, non-local means, noise draws); not families."""
