defmodule Drab.Presence.ConfigTest do
  # Changes the :drab application env, so not async.
  use Drab.PresenceCase, async: false

  alias Drab.Presence.Config

  setup do: restore_env_on_exit(:drab, :presence)

  defp with_presence(config), do: Application.put_env(:drab, :presence, config)

  defp assigns(session, store),
    do: %{assigns: %{__session: session, __store: store, __client_id: "browser"}}

  describe "Drab.Config.get(:presence, _) equivalents" do
    test "unset" do
      Application.delete_env(:drab, :presence)
      assert Config.presence() == false
      assert Config.get(:id) == nil
      assert Config.get(:module) == Drab.Presence
      assert Config.get(:endpoint) == nil
    end

    test "true: browser id, Drab.Presence" do
      with_presence(true)
      assert Config.get(:id) == nil
      assert Config.get(:module) == Drab.Presence
    end

    test "a keyword list without :id means [session: :user_id]" do
      with_presence(endpoint: MyEndpoint)
      assert Config.get(:id) == [session: :user_id]
      assert Config.get(:endpoint) == MyEndpoint
    end

    test "module:" do
      with_presence(module: MyPresence)
      assert Config.get(:module) == MyPresence
    end
  end

  describe "client_id/1" do
    test "true uses the browser id" do
      with_presence(true)
      assert Config.client_id(assigns(%{user_id: 1}, %{user_id: 2})) == "browser"
    end

    test "[session: key]" do
      with_presence(id: [session: :uid])
      assert Config.client_id(assigns(%{uid: 42}, %{uid: 7})) == 42
      assert Config.client_id(assigns(%{}, %{uid: 7})) == "browser"
      assert Config.client_id(assigns(nil, %{})) == "browser"
    end

    test "[store: key]" do
      with_presence(id: [store: :uid])
      assert Config.client_id(assigns(%{uid: 42}, %{uid: 7})) == 7
      assert Config.client_id(assigns(%{uid: 42}, %{})) == "browser"
    end

    test "store first, then session" do
      with_presence(id: [store: :uid, session: :sid])
      assert Config.client_id(assigns(%{sid: 1}, %{uid: 2})) == 2
      assert Config.client_id(assigns(%{sid: 1}, %{})) == 1
      assert Config.client_id(assigns(%{}, %{})) == "browser"
    end

    test "session first, then store" do
      with_presence(id: [session: :sid, store: :uid])
      assert Config.client_id(assigns(%{sid: 1}, %{uid: 2})) == 1
      assert Config.client_id(assigns(%{}, %{uid: 2})) == 2
    end

    test "a bare atom is a session key" do
      with_presence(id: :sid)
      assert Config.client_id(assigns(%{sid: 1}, %{})) == 1
    end

    test "the default of a keyword list reads the session's :user_id" do
      with_presence([])
      assert Config.client_id(assigns(%{user_id: 5}, %{})) == 5
    end

    test "without any id it raises as Drab does" do
      with_presence(true)

      assert_raise RuntimeError, "can't get the browser id", fn ->
        Config.client_id(%{assigns: %{}})
      end
    end

    test "start/2 tracks under the configured id", %{topic: topic} do
      with_presence(id: [session: :user_id])
      socket = socket(topic, %{__session: %{user_id: 42}, __store: %{}})
      {:ok, _} = Drab.Presence.start(socket, topic)
      assert Map.keys(Drab.Presence.list(topic)) == ["42"]
      :ok = Drab.Presence.stop(socket, topic)
      assert Drab.Presence.list(topic) == %{}
    end
  end

  describe "options" do
    test "our own keys pass through; Drab's stay behind" do
      with_presence(id: [session: :u], module: X, diff_window: 5, pubsub_server: My.PubSub)

      assert Keyword.take(Config.options(), [:diff_window, :pubsub_server]) == [
               diff_window: 5,
               pubsub_server: My.PubSub
             ]

      refute Keyword.has_key?(Config.options(), :id)
    end

    test "the pubsub server comes from the Drab endpoint's config" do
      Application.put_env(:drab, ConfigTest.Endpoint, otp_app: :drab_presence_config_test)

      Application.put_env(:drab_presence_config_test, ConfigTest.Endpoint,
        pubsub_server: From.Endpoint
      )

      on_exit(fn ->
        Application.delete_env(:drab, ConfigTest.Endpoint)
        Application.delete_env(:drab_presence_config_test, ConfigTest.Endpoint)
      end)

      with_presence(endpoint: ConfigTest.Endpoint)
      assert Config.endpoint_pubsub_server() == From.Endpoint
      layers = Drab.Presence.Definition.options(Drab.Presence, [], [])
      assert Drab.Presence.Options.validate!(layers)[:pubsub_server] == From.Endpoint

      # A default: the config's own pubsub_server, or the child's, wins.
      with_presence(endpoint: ConfigTest.Endpoint, pubsub_server: Own.PubSub)
      layers = Drab.Presence.Definition.options(Drab.Presence, [], [])
      assert Drab.Presence.Options.validate!(layers)[:pubsub_server] == Own.PubSub
      with_presence(endpoint: ConfigTest.Endpoint)
      layers = Drab.Presence.Definition.options(Drab.Presence, [], pubsub_server: Child.PubSub)
      assert Drab.Presence.Options.validate!(layers)[:pubsub_server] == Child.PubSub
    end

    test "Phoenix.Presence's precedence: use, then the child spec, then the app env wins" do
      defmodule Layered do
        use Drab.Presence,
          otp_app: :drab_presence,
          backend: Drab.PresenceCase.backend(),
          max_meta_bytes: 100,
          diff_window: 10
      end

      use_opts = [otp_app: :drab_presence, max_meta_bytes: 100]
      effective = &Drab.Presence.Definition.options(Layered, use_opts, &1)

      Application.put_env(:drab_presence, Layered, max_meta_bytes: 300)
      on_exit(fn -> Application.delete_env(:drab_presence, Layered) end)

      assert Drab.Presence.Options.validate!(effective.(max_meta_bytes: 200))[:max_meta_bytes] ==
               300

      # Seen in behaviour: the env's limit applies, not the child's.
      start_supervised!({Layered, max_meta_bytes: 200, cluster: false})
      meta = %{blob: String.duplicate("x", 250)}
      assert {:ok, _} = Layered.track(live_pid(), "layered", "k", meta)
      stop_supervised!(Layered)

      Application.delete_env(:drab_presence, Layered)

      assert Drab.Presence.Options.validate!(effective.(max_meta_bytes: 200))[:max_meta_bytes] ==
               200

      assert Drab.Presence.Options.validate!(effective.([]))[:max_meta_bytes] == 100
    end

    test "Phoenix.Tracker's options: mapped where they mean something, else ignored" do
      validate = &Drab.Presence.Options.validate!([&1])

      log =
        ExUnit.CaptureLog.capture_log([level: :debug], fn ->
          opts = validate.(pool_size: 4, clock_sample_periods: 2, log_level: false)
          assert opts[:heartbeat_period] == 1_500
          assert opts[:down_period] == 30_000
          refute Keyword.has_key?(opts, :pool_size)
        end)

      assert log =~
               "ignores the Phoenix.Tracker options [:pool_size, :clock_sample_periods, " <>
                 ":log_level]"

      # Phoenix's down_period default: broadcast_period * max_silent_periods * 2.
      opts = validate.(broadcast_period: 500, max_silent_periods: 4)
      assert {opts[:heartbeat_period], opts[:down_period]} == {500, 4_000}
      assert validate.(max_silent_periods: 5)[:down_period] == 15_000

      # Ours, when given, win over what the tracker's would make of them.
      opts = validate.(broadcast_period: 500, heartbeat_period: 700, down_period: 9_000)
      assert {opts[:heartbeat_period], opts[:down_period]} == {700, 9_000}

      assert_raise ArgumentError, ~r/invalid value for :broadcast_period/, fn ->
        validate.(broadcast_period: 0)
      end

      # Still an error: a key neither we nor Phoenix.Tracker know.
      assert_raise ArgumentError, ~r/unknown presence options \[:pool_sise\]/, fn ->
        validate.(pool_sise: 1)
      end
    end

    @tag :capture_log
    test "a module migrated from Phoenix.Presence starts with the tracker options it passed" do
      defmodule Migrated do
        use Drab.Presence,
          otp_app: :drab_presence,
          backend: Drab.PresenceCase.backend(),
          diff_window: 0,
          pool_size: 8,
          broadcast_period: 100,
          max_silent_periods: 5,
          down_period: 10_000,
          permdown_period: 60_000,
          clock_sample_periods: 3,
          log_level: :info
      end

      start_supervised!(Migrated)
      assert {:ok, _} = Migrated.track(live_pid(), "migrated", "k", %{})
      assert Migrated.count_users("migrated") == 1
    end

    test "invalid options are refused up front with a clear message" do
      defmodule BadOptions do
        use Drab.Presence, otp_app: :drab_presence, backend: Drab.PresenceCase.backend()
      end

      assert_raise ArgumentError, ~r/unknown presence options \[:diff_windw\]/, fn ->
        BadOptions.start_link(diff_windw: 10)
      end

      assert_raise ArgumentError,
                   ~r/invalid value for :diff_window: expected an integer from 0 to 60000/,
                   fn ->
                     BadOptions.start_link(diff_window: -1)
                   end

      assert_raise ArgumentError, ~r/invalid value for :backend/, fn ->
        BadOptions.start_link(backend: :redis)
      end
    end

    test "a build without the NIF defaults to the sidecar and refuses backend: :nif by name" do
      alias Drab.Presence.Options
      # Given, NIF in the build.
      assert Options.check_backend!([backend: :nif], true, true)[:backend] == :nif
      # The default, without it (`config :drab_presence, nif: false`).
      assert Options.check_backend!([backend: :nif], false, false)[:backend] == :sidecar
      assert Options.check_backend!([backend: :sidecar], true, false)[:backend] == :sidecar

      assert_raise ArgumentError, ~r/backend: :nif needs the NIF.*nif: false/, fn ->
        Options.check_backend!([backend: :nif], true, false)
      end

      # This suite's build has it.
      assert Drab.Presence.Native.enabled?()
    end

    test "use without :otp_app is refused at compile time" do
      assert_raise ArgumentError, ~r/expects :otp_app/, fn ->
        Code.compile_string("defmodule NoApp do use Drab.Presence end")
      end
    end
  end
end
