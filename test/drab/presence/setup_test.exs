defmodule Drab.Presence.SetupTest do
  # Some tests change the :drab application env, so not async.
  use ExUnit.Case, async: false

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

  describe "config :drab, :presence, true" do
    setup do: Drab.PresenceCase.restore_env_on_exit(:drab, :presence)

    test "becomes [id: []], which Drab reads, said at info level" do
      Application.put_env(:drab, :presence, true)

      log = ExUnit.CaptureLog.capture_log([level: :info], &Setup.normalize_config/0)
      assert Application.get_env(:drab, :presence) == [id: []]
      assert log =~ "[info]"
      assert log =~ "is read as `config :drab, :presence, id: []`"

      # Still the browser id, as `true` meant.
      socket = %{assigns: %{__client_id: "browser", __session: %{user_id: 1}, __store: %{}}}
      assert Drab.Presence.Config.client_id(socket) == "browser"

      assert problems(presence_config: Application.get_env(:drab, :presence), drab_loaded?: true) ==
               []
    end

    test "is mended when the application starts, in a VM of its own" do
      script = Path.expand("../../fresh_vm/config_true.exs", __DIR__)
      {output, status} = Drab.PresenceCase.run_clean_vm(script)
      assert status == 0, "config_true.exs exited with #{status}:\n#{output}"
      assert output =~ "[info]"
      assert output =~ "is read as `config :drab, :presence, id: []`"
      assert output =~ "fresh VM: ok"
    end

    test "other configs are left as they are" do
      for config <- [[id: [session: :uid]], [], false] do
        Application.put_env(:drab, :presence, config)
        assert ExUnit.CaptureLog.capture_log(&Setup.normalize_config/0) == ""
        assert Application.get_env(:drab, :presence) == config
      end
    end
  end

  describe "a presence module without :pubsub_server" do
    test "is named at start where Phoenix is loaded, with the fix" do
      assert Setup.pubsub_problem(OwnPresence, [[otp_app: :a], []], true) =~
               "OwnPresence has no :pubsub_server"

      assert Setup.pubsub_problem(OwnPresence, [[]], true) =~ "pubsub_server: MyApp.PubSub"
      assert Setup.pubsub_problem(Drab.Presence, [[]], true) =~ "endpoint: MyAppWeb.Endpoint"
      assert Setup.pubsub_problem(OwnPresence, [[], [pubsub_server: My.PubSub]], true) == nil
      # Said on purpose: the built-in registry is meant.
      assert Setup.pubsub_problem(OwnPresence, [[pubsub_server: nil]], true) == nil
      assert Setup.pubsub_problem(OwnPresence, [[]], false) == nil
    end

    @tag :phoenix
    test "is logged by start_link when Phoenix is loaded" do
      defmodule NoPubSub do
        use Drab.Presence, otp_app: :drab_presence, backend: Drab.PresenceCase.backend()
      end

      log =
        ExUnit.CaptureLog.capture_log(fn ->
          {:ok, sup} = NoPubSub.start_link(cluster: false)
          Supervisor.stop(sup)
        end)

      assert log =~ "NoPubSub has no :pubsub_server"
    end
  end

  test "an endpoint Drab has no config for" do
    assert [message] = problems(presence_config: [endpoint: NoSuch.Endpoint])
    assert message =~ "Drab has no config for that endpoint"
  end
end
