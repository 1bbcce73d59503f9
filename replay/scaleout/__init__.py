"""Scale-out: worker processes, Ray, sharding a schedule, merging their run directories."""
