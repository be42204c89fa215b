"""One module per resource; each controller declares its security, scope and guards once."""
