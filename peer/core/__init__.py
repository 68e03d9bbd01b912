"""Pure protocol cores: (message, now) in, actions out. No sockets, threads or clock of their own."""
