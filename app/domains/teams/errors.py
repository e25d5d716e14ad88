from app.core.errors import Conflict, InvalidRequest, NotFound, TuneforgeError, Unauthorized


class InvalidApiKey(Unauthorized):
    pass


class TeamExists(Conflict):
    code = "team_exists"


class InvalidTeamName(InvalidRequest):
    code = "invalid_team_name"


class AdminRequired(TuneforgeError):
    status_code = 403
    type = "permission_error"
    code = "admin_key_required"


class KeyNotFound(NotFound):
    code = "key_not_found"


class KeyRevoked(Conflict):
    code = "key_revoked"


class LastAdminKey(Conflict):
    code = "last_admin_key"
