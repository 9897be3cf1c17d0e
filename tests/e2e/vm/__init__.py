"""A small bootable test VM disk built from Debian packages, without root or mounts."""
