"""The study: several recipes from one base under a matched budget, evaluated alike, reported side by side."""
