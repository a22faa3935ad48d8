"""vSphere integration of the master target (pyvmomi): discovery, preflight checks,
attaching and detaching replicated disks, and creating the VM of a failed-back server."""
