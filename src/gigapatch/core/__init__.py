"""gigapatch.core: patch geometry, sampling, units, registry, errors and atomic files."""
