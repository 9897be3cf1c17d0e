"""The hosts of a cluster: each storage node's engine worker registers itself and beats."""
