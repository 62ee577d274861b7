"""The methods SEFT is compared with, one module each with its citation and paper defaults, every
one ending with exactly the starting model's nonzero budget per target matrix: static (static.py),
lora_star (lora_star.py), sqft (sqft.py), spp (spp.py), none (none.py). They run on one process;
common.py holds what they share."""
