"""The PEFT adapter format: config parsing (via peft), target resolution onto our layer sites, safetensors
reading and checks, and writing adapters PEFT loads back (format.py is the entry point)."""
