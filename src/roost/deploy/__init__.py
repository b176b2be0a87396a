"""Fleet deploys driven from the controller: local simulation today, SSH next."""
