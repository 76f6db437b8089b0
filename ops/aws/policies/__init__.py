"""checkov policies of this project (see open_ports.py)."""
