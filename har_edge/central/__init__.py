"""har-edge central: the server side a fleet shares (object store, database, tracking server), run on one host."""
