"""Demo source data: the real UCI Online Retail order log plus simulated live viewing."""
