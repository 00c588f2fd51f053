//! The lab: an isolated namespace network with QEMU VMs netbooting from corral (`corral lab`, end-to-end tests).
