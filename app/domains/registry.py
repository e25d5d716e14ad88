"""Imports every domain's ORM models so Base.metadata is complete (Alembic, tests)."""

from app.core.db import Base
from app.domains.adapters import models as _adapters  # noqa: F401
from app.domains.audit import models as _audit  # noqa: F401
from app.domains.checkpoints import models as _checkpoints  # noqa: F401
from app.domains.evaluations import models as _evaluations  # noqa: F401
from app.domains.exports import models as _exports  # noqa: F401
from app.domains.files import models as _files  # noqa: F401
from app.domains.idempotency import models as _idempotency  # noqa: F401
from app.domains.jobs import models as _jobs  # noqa: F401
from app.domains.base_models import models as _base_models  # noqa: F401
from app.domains.quotas import models as _quotas  # noqa: F401
from app.domains.serving import models as _serving  # noqa: F401
from app.domains.teams import models as _teams  # noqa: F401
from app.domains.uploads import models as _uploads  # noqa: F401
from app.domains.webhooks import models as _webhooks  # noqa: F401

metadata = Base.metadata
