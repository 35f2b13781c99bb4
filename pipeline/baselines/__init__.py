"""The baselines DDPT is compared with, run through the same harness."""
