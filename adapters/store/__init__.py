"""Where adapters and jobs are stored: the registry (metadata store + content-addressed blob store, one
commit transaction), its SQLite/PostgreSQL and filesystem/S3 implementations, change notifications between
replicas, and upload spooling. Nothing here touches the model or a device."""
