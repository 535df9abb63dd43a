"""The training recipes (YAML), shipped with the package so that `odis train -c NAME` finds them from any folder."""
