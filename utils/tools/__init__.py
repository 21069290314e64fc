"""Offline tools: the embedded demo (demo), the benchmark (benchmark) and the official formulation it
measures against (official_formulation). No step imports them."""
