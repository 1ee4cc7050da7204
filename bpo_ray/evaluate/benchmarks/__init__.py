"""One module per benchmark: loaders (public format + bias world), judge protocol, scorer."""
