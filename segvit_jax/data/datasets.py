"""(being written)"""

BUILDERS = {}
