"""SlateCTR: the `ctr` command line that ties the offline pipeline, export and service together."""

__version__ = "0.1.0"
