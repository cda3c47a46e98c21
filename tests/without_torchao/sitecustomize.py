import sys

sys.modules["torchao"] = None  # find_spec says: not installed (diffusers imports torchao whenever it is)
