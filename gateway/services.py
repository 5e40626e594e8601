"""Where the services plug into a started gateway (limits, accounting, catalogue, …).

Each service installs itself here: it sets the proxy's hooks (`admission`, `recorder`,
`preparer`) or attaches itself to the gateway, and registers its background jobs and
shutdown flushes. `create_app` calls this after the foundations are open.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.app import Gateway


async def install_services(gateway: "Gateway") -> None:
    from gateway.accounting.ledger import install_accounting

    await install_accounting(gateway)  # first: others (limits) register ledger listeners
    from gateway.accounts.provisioning import install_provisioning

    await install_provisioning(gateway)
    from gateway.limits.limiter import install_limits

    await install_limits(gateway)  # after accounting: counts spend from the ledger's listeners
    from gateway.accounts.credit_sync import install_credit_sync
    from gateway.accounts.settings import install_settings

    await install_settings(gateway)  # sets gateway.preparer: users' defaults fill absent fields
    await install_credit_sync(gateway)
    gateway.catalog.warm()  # fetch the model list in the background so prices are known early
