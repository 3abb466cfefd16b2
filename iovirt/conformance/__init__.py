"""A conformance suite for virtio devices behind any vhost-user back-end.

iovirt plays the VMM and the guest driver (:mod:`iovirt.vhost_user.frontend`,
:class:`iovirt.virtio.driver.DriverQueue`) and checks the back-end against
QEMU's ``docs/interop/vhost-user.rst`` and the OASIS virtio 1.2 specification,
clause by clause:

* :mod:`.registry` - the checks, each labelled by the clause it comes from;
* :mod:`.checks` - the checks themselves, one module per specification part;
* :mod:`.link` - one front-end connection with shared memory and driver rings;
* :mod:`.target` - what is tested (socket, device type) and what it offers;
* :mod:`.runner` - runs checks with bounded waits, surviving broken back-ends;
* :mod:`.report` - terminal table, JSON and JUnit XML;
* :mod:`.cli` (``iovirt conform``) and :mod:`.pytest_plugin`.
"""
