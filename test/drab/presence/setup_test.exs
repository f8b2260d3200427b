defmodule Drab.Presence.SetupTest do
  use ExUnit.Case, async: true

  alias Drab.Presence.Setup

  # Stands in for the Drab.Presence that Drab compiles: a module of that
  # role without drab_presence's functions.
  defmodule DrabsOwnPresence do
    def count_users(_topic), do: 0
  end

  defmodule OwnPresence do
    use Drab.Presence, otp_app: :drab_presence, backend: Drab.PresenceCase.backend()
  end

  defp problems(env) do
    Setup.problems(Keyword.merge([drab_loaded?: false, presence_config: false], env))
  end

  test "a correct setup has no problems" do
    assert problems([]) == []
    assert problems(presence_config: [id: [session: :user_id], module: OwnPresence]) == []
  end

  test "Drab's own Drab.Presence on the code path is named, with the fix" do
    assert [message] = problems(presence_module: DrabsOwnPresence)
    assert message =~ "is Drab's own module"
    assert message =~ "config/runtime.exs"
  end

  test "`true` with Drab loaded is named, with the keyword list to use instead" do
    assert [message] = problems(presence_config: true, drab_loaded?: true)
    assert message =~ "id: []"
    assert problems(presence_config: true, drab_loaded?: false) == []
  end

  test "a configured module that does not use Drab.Presence, or does not exist" do
    assert [message] = problems(presence_config: [module: DrabsOwnPresence])
    assert message =~ "does not `use Drab.Presence`"
    assert [message] = problems(presence_config: [module: No.Such.Module])
    assert message =~ "no such module"
  end

  test "an endpoint Drab has no config for" do
    assert [message] = problems(presence_config: [endpoint: NoSuch.Endpoint])
    assert message =~ "Drab has no config for that endpoint"
  end
end
