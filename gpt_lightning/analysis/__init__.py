"""Reading finished runs and turning them into evidence: arms, statistics, report sentences."""
