"""Reports for people: sweep tables, the results page and its figures, learning curves."""
