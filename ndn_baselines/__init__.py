"""ndn_baselines: Antolík et al. 2016 HSM and the NDN3-thesis variants, many seeds trained at once (see main.py)."""
