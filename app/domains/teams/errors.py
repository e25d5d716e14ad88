from app.core.errors import Conflict, InvalidRequest, Unauthorized


class InvalidApiKey(Unauthorized):
    pass


class TeamExists(Conflict):
    code = "team_exists"


class InvalidTeamName(InvalidRequest):
    code = "invalid_team_name"
